// The settings panel and the session.update it becomes.
import { WIRE_RATE } from "./audio.js";

// the endpoint maps audio.output.speed below 0.9 to "slow" and above 1.1 to "fast"
const OUTPUT_SPEED = { slow: 0.8, "": 1.0, fast: 1.25 };

export function readSettings(form) {
  const data = new FormData(form);
  return {
    emotion: String(data.get("emotion") || ""),
    speed: String(data.get("speed") || ""),
    dialect: String(data.get("dialect") || ""),
    temperature: Number(data.get("temperature") || 0.2),
  };
}

// Optional page parameters for reproducible demos: ?seed=7&max_output_tokens=200&top_p=1&temperature=1
export function pageOverrides(search) {
  const params = new URLSearchParams(search);
  const out = {};
  const seed = params.get("seed");
  if (seed !== null && /^\d+$/.test(seed)) out.seed = Number(seed);
  const maxTokens = params.get("max_output_tokens");
  if (maxTokens !== null && /^\d+$/.test(maxTokens)) out.maxOutputTokens = Number(maxTokens);
  const topP = Number(params.get("top_p"));
  if (params.get("top_p") !== null && topP > 0 && topP <= 1) out.topP = topP;
  const temperature = Number(params.get("temperature"));
  if (params.get("temperature") !== null && temperature >= 0 && temperature <= 1.5) out.temperature = temperature;
  return out;
}

export function sessionUpdate(settings, overrides = {}) {
  const pcm = { type: "audio/pcm", rate: WIRE_RATE };
  const session = {
    type: "realtime",
    output_modalities: ["audio"],
    audio: {
      input: {
        format: pcm,
        turn_detection: {
          type: "server_vad",
          threshold: 0.5,
          prefix_padding_ms: 300,
          silence_duration_ms: 500,
          create_response: true,
          interrupt_response: true,
        },
      },
      output: { format: pcm, speed: OUTPUT_SPEED[settings.speed] ?? 1.0 },
    },
    glmv: {
      emotion: settings.emotion || null,
      dialect: settings.dialect || null,
      temperature: settings.temperature,
    },
  };
  if (overrides.seed !== undefined) session.glmv.seed = overrides.seed;
  if (overrides.topP !== undefined) session.glmv.top_p = overrides.topP;
  if (overrides.maxOutputTokens !== undefined) session.max_output_tokens = overrides.maxOutputTokens;
  return { type: "session.update", session };
}
