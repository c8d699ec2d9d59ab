"""Decoder hyperparameters from the published ``config.yaml``, read without executing it.

The published file is a hyperpyyaml document: ``!new:pkg.Class`` constructs objects, ``!apply:pkg.func``
calls functions (it reseeds every RNG at load time), ``!ref <key>`` refers to other keys. Loading it with
hyperpyyaml would import and run whatever it names. Here it is parsed by a PyYAML ``SafeLoader`` subclass
whose tag constructors only *record* the tag (:class:`Call`: kind, dotted target, args, kwargs): nothing is
imported, constructed, called or seeded, and the unused ``llm`` section is never looked at beyond parsing.
``!ref`` references are resolved against the parsed document. The recorded tree is then turned into typed,
validated hyperparameters (:class:`DecoderConfig`); anything this implementation does not support raises
:class:`~glmv_common.errors.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from glmv_common.errors import CheckpointError
from glmv_decoder.hift import HiFTConfig

__all__ = [
    "CFMConfig",
    "Call",
    "DecoderConfig",
    "EncoderConfig",
    "EstimatorConfig",
    "FlowConfig",
    "HiFTConfig",
    "LengthRegulatorConfig",
    "Ref",
    "load_config",
    "load_tagged_yaml",
    "parse_config",
]

@dataclass(frozen=True)
class Call:
    """A recorded `!new:` / `!apply:` / `!name:` node (never executed)."""

    kind: str  # "new" | "apply" | "name"
    target: str  # dotted path as written, e.g. "cosyvoice.flow.flow.MaskedDiffWithXvec"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Ref:
    """A recorded `!ref <path>` node, resolved after loading."""

    expr: str


_REF_RE = re.compile(r"^\s*<([A-Za-z_][\w.]*(?:\[[^\]]+\])*)>\s*$")


class _RecordingLoader(yaml.SafeLoader):
    """SafeLoader that records hyperpyyaml tags instead of acting on them."""


def _node_value(loader: _RecordingLoader, node: yaml.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        return (), {str(k): v for k, v in mapping.items()}
    if isinstance(node, yaml.SequenceNode):
        return tuple(loader.construct_sequence(node, deep=True)), {}
    value = loader.construct_scalar(node)
    return ((value,) if value != "" else ()), {}


def _make_call_constructor(kind: str):
    def construct(loader: _RecordingLoader, suffix: str, node: yaml.Node) -> Call:
        if not re.fullmatch(r"[A-Za-z_][\w.]*", suffix):
            raise yaml.constructor.ConstructorError(
                None, None, f"malformed !{kind}: target {suffix!r}", node.start_mark
            )
        args, kwargs = _node_value(loader, node)
        return Call(kind=kind, target=suffix, args=args, kwargs=kwargs)

    return construct


def _construct_ref(loader: _RecordingLoader, node: yaml.Node) -> Ref:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, "!ref expects a scalar", node.start_mark)
    return Ref(str(loader.construct_scalar(node)))


def _construct_float(loader: _RecordingLoader, node: yaml.Node) -> Any:
    return float(str(loader.construct_scalar(node)).replace("_", ""))


for _kind in ("new", "apply", "name"):
    _RecordingLoader.add_multi_constructor(f"!{_kind}:", _make_call_constructor(_kind))
_RecordingLoader.add_constructor("!ref", _construct_ref)
_RecordingLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_RecordingLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _unknown_tag(loader: _RecordingLoader, suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"unsupported YAML tag {node.tag!r}", node.start_mark
    )


_RecordingLoader.add_multi_constructor("!", _unknown_tag)


def _lookup(doc: dict[str, Any], expr: str, where: str) -> Any:
    match = _REF_RE.match(expr)
    if match is None:
        raise CheckpointError(f"{where}: unsupported !ref expression {expr!r} (only `<name>` is allowed)")
    path = match.group(1)
    head, *rest = re.split(r"[.\[]", path)
    if head not in doc:
        raise CheckpointError(f"{where}: !ref {expr!r} names an unknown key {head!r}")
    value = doc[head]
    for part in rest:
        part = part.rstrip("]").strip("'\"")
        if isinstance(value, Call):
            value = value.kwargs
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise CheckpointError(f"{where}: !ref {expr!r} cannot be resolved at {part!r}")
    return value


def _resolve(value: Any, doc: dict[str, Any], where: str, depth: int = 0) -> Any:
    if depth > 32:
        raise CheckpointError(f"{where}: !ref chain too deep (cycle?)")
    if isinstance(value, Ref):
        return _resolve(_lookup(doc, value.expr, where), doc, where, depth + 1)
    if isinstance(value, Call):
        return Call(
            kind=value.kind,
            target=value.target,
            args=tuple(_resolve(a, doc, where, depth) for a in value.args),
            kwargs={k: _resolve(v, doc, where, depth) for k, v in value.kwargs.items()},
        )
    if isinstance(value, dict):
        return {k: _resolve(v, doc, where, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, doc, where, depth) for v in value]
    return value


def load_tagged_yaml(text: str, where: str = "config.yaml") -> dict[str, Any]:
    """Parse hyperpyyaml text into plain data with `Call` records; resolve `!ref`s. Executes nothing."""
    try:
        doc = yaml.load(text, Loader=_RecordingLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{where}: not a valid decoder config: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    return {str(k): _resolve(v, doc, where) for k, v in doc.items()}


# ---------------------------------------------------------------------------------------------------------
# Typed hyperparameters (defaults = the published GLM-4-Voice decoder config).


@dataclass(frozen=True)
class EncoderConfig:
    """``flow.encoder`` (BlockConformerEncoder)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    normalize_before: bool = True
    input_layer: str = "linear"
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "block_rel_selfattn"
    block_size: int = 10
    use_cnn_module: bool = False
    macaron_style: bool = False
    static_chunk_size: int = 0
    use_dynamic_chunk: bool = False
    use_dynamic_left_chunk: bool = False
    key_bias: bool = True
    activation_type: str = "swish"


@dataclass(frozen=True)
class LengthRegulatorConfig:
    """``flow.length_regulator`` (InterpolateRegulator)."""

    channels: int = 80
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    out_channels: int | None = None
    groups: int = 1


@dataclass(frozen=True)
class EstimatorConfig:
    """``flow.decoder.estimator`` (ConditionalDecoder, a 1-D U-Net with transformer blocks)."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"


@dataclass(frozen=True)
class CFMConfig:
    """``flow.decoder`` (ConditionalCFM) and its ``cfm_params``."""

    in_channels: int = 240
    n_spks: int = 1
    spk_emb_dim: int = 80
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    reg_loss_type: str = "l1"
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


@dataclass(frozen=True)
class FlowConfig:
    """``flow`` (MaskedDiffWithXvec)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 16384
    input_frame_rate: float = 12.5
    only_mask_loss: bool = True
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    length_regulator: LengthRegulatorConfig = field(default_factory=LengthRegulatorConfig)
    decoder: CFMConfig = field(default_factory=CFMConfig)

    @property
    def estimator(self) -> EstimatorConfig:
        return self.decoder.estimator


@dataclass(frozen=True)
class DecoderConfig:
    """The whole decoder: sample rate, flow and HiFT hyperparameters."""

    sample_rate: int = 22050
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)


# ---------------------------------------------------------------------------------------------------------
# Recorded tree -> typed config.

_FLOW_CLASSES = {"MaskedDiffWithXvec"}
_ENCODER_CLASSES = {"BlockConformerEncoder"}
_REGULATOR_CLASSES = {"InterpolateRegulator"}
_CFM_CLASSES = {"ConditionalCFM"}
_ESTIMATOR_CLASSES = {"ConditionalDecoder"}
_HIFT_CLASSES = {"HiFTGenerator"}
_F0_CLASSES = {"ConvRNNF0Predictor"}


def _expect_new(value: Any, classes: set[str], key: str, where: str) -> Call:
    if not isinstance(value, Call) or value.kind != "new":
        raise CheckpointError(f"{where}: `{key}` must be a `!new:` object, got {type(value).__name__}")
    if value.class_name not in classes:
        raise CheckpointError(
            f"{where}: `{key}` is {value.target!r}; this decoder supports only {sorted(classes)}"
        )
    if value.args:
        raise CheckpointError(f"{where}: `{key}` must use keyword arguments")
    return value


def _coerce(value: Any, annotation: str, key: str, where: str) -> Any:
    try:
        if annotation == "bool":
            if not isinstance(value, bool):
                raise TypeError("expected true/false")
            return value
        if annotation == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if annotation == "int | None":
            return None if value is None else _coerce(value, "int", key, where)
        if annotation == "float":
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if annotation == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
        if annotation == "tuple[int, ...]":
            if not isinstance(value, list | tuple):
                raise TypeError("expected a list")
            return tuple(_coerce(v, "int", key, where) for v in value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: `{key}` = {value!r}: {exc}") from exc
    raise AssertionError(f"unhandled annotation {annotation}")  # pragma: no cover


def _build(cls: type, kwargs: dict[str, Any], key: str, where: str, **nested: Any) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise CheckpointError(f"{where}: `{key}` has unsupported parameters {unknown}")
    values: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in nested:
            continue
        values[name] = _coerce(value, str(known[name].type), f"{key}.{name}", where)
    values.update(nested)
    return cls(**values)


def _parse_encoder(call: Call, where: str) -> EncoderConfig:
    cfg: EncoderConfig = _build(EncoderConfig, call.kwargs, "flow.encoder", where)
    checks = {
        "input_layer": ("linear",),
        "pos_enc_layer_type": ("rel_pos_espnet",),
        "selfattention_layer_type": ("block_rel_selfattn",),
        "activation_type": ("swish",),
        "normalize_before": (True,),
        "use_cnn_module": (False,),
        "macaron_style": (False,),
        "static_chunk_size": (0,),
        "use_dynamic_chunk": (False,),
    }
    for name, allowed in checks.items():
        if getattr(cfg, name) not in allowed:
            raise CheckpointError(
                f"{where}: flow.encoder.{name} = {getattr(cfg, name)!r} is not supported "
                f"(supported: {allowed})"
            )
    if cfg.output_size % cfg.attention_heads:
        raise CheckpointError(f"{where}: flow.encoder.output_size must be divisible by attention_heads")
    if cfg.block_size < 1:
        raise CheckpointError(f"{where}: flow.encoder.block_size must be >= 1")
    return cfg


def _parse_cfm(call: Call, where: str) -> CFMConfig:
    kwargs = dict(call.kwargs)
    estimator_call = _expect_new(kwargs.pop("estimator", None), _ESTIMATOR_CLASSES, "flow.decoder.estimator",
                                 where)
    params = kwargs.pop("cfm_params", {})
    if isinstance(params, Call):
        if params.class_name != "DictConfig":
            raise CheckpointError(f"{where}: flow.decoder.cfm_params must be a mapping or DictConfig")
        params = params.kwargs.get("content", params.args[0] if params.args else {})
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: flow.decoder.cfm_params must be a mapping")
    overlap = sorted(set(params) & set(kwargs))
    if overlap:
        raise CheckpointError(f"{where}: flow.decoder sets {overlap} twice")
    estimator = _build(EstimatorConfig, estimator_call.kwargs, "flow.decoder.estimator", where)
    cfg: CFMConfig = _build(CFMConfig, {**kwargs, **params}, "flow.decoder", where, estimator=estimator)
    if cfg.solver != "euler":
        raise CheckpointError(f"{where}: flow.decoder solver {cfg.solver!r} is not supported (euler)")
    if cfg.t_scheduler not in ("cosine", "linear"):
        raise CheckpointError(f"{where}: flow.decoder t_scheduler {cfg.t_scheduler!r} is not supported")
    if estimator.act_fn != "gelu":
        raise CheckpointError(f"{where}: flow.decoder.estimator.act_fn {estimator.act_fn!r} is not supported")
    if not estimator.channels or any(c % 8 for c in estimator.channels):
        raise CheckpointError(f"{where}: flow.decoder.estimator.channels must be multiples of 8 (GroupNorm)")
    return cfg


def _parse_flow(call: Call, where: str) -> FlowConfig:
    kwargs = dict(call.kwargs)
    enc_call = _expect_new(kwargs.pop("encoder", None), _ENCODER_CLASSES, "flow.encoder", where)
    encoder = _parse_encoder(enc_call, where)
    reg_call = _expect_new(kwargs.pop("length_regulator", None), _REGULATOR_CLASSES, "flow.length_regulator",
                           where)
    regulator = _build(LengthRegulatorConfig, reg_call.kwargs, "flow.length_regulator", where)
    cfm = _parse_cfm(_expect_new(kwargs.pop("decoder", None), _CFM_CLASSES, "flow.decoder", where), where)
    cfg: FlowConfig = _build(FlowConfig, kwargs, "flow", where, encoder=encoder, length_regulator=regulator,
                             decoder=cfm)
    est = cfm.estimator
    mel = cfg.output_size
    problems = []
    if cfg.output_type != "mel":
        problems.append(f"output_type {cfg.output_type!r} (only 'mel')")
    if encoder.input_size != cfg.input_size:
        problems.append("encoder.input_size != input_size")
    if regulator.channels != mel or (regulator.out_channels or regulator.channels) != mel:
        problems.append("length_regulator channels != output_size")
    if est.out_channels != mel:
        problems.append("estimator.out_channels != output_size")
    if est.in_channels != 4 * mel:
        problems.append("estimator.in_channels != 4 * output_size (x, mu, spks, cond)")
    if cfm.spk_emb_dim != mel or cfm.n_spks < 1:
        problems.append("decoder.spk_emb_dim != output_size")
    if cfg.input_frame_rate <= 0:
        problems.append("input_frame_rate must be > 0")
    if problems:
        raise CheckpointError(f"{where}: inconsistent flow config: " + "; ".join(problems))
    return cfg


def _plain(value: Any) -> Any:
    """Recorded `!new:` nodes inside the hift section (f0_predictor) become their kwargs."""
    if isinstance(value, Call):
        return {k: _plain(v) for k, v in value.kwargs.items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _parse_hift(call: Call, where: str) -> HiFTConfig:
    kwargs = dict(call.kwargs)
    f0 = kwargs.get("f0_predictor")
    if f0 is not None:
        _expect_new(f0, _F0_CLASSES, "hift.f0_predictor", where)
    try:
        return HiFTConfig.from_dict(_plain(kwargs))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad `hift` section: {exc}") from exc


def parse_config(text: str, where: str = "config.yaml") -> DecoderConfig:
    """Parse the text of a decoder ``config.yaml`` into :class:`DecoderConfig` (executes nothing)."""
    doc = load_tagged_yaml(text, where)
    for key in ("flow", "hift"):
        if key not in doc:
            raise CheckpointError(f"{where}: missing top-level `{key}` section")
    flow = _parse_flow(_expect_new(doc["flow"], _FLOW_CLASSES, "flow", where), where)
    hift = _parse_hift(_expect_new(doc["hift"], _HIFT_CLASSES, "hift", where), where)
    sample_rate = _coerce(doc.get("sample_rate", hift.sampling_rate), "int", "sample_rate", where)
    if hift.sampling_rate != sample_rate:
        raise CheckpointError(
            f"{where}: hift.sampling_rate {hift.sampling_rate} != sample_rate {sample_rate}"
        )
    if hift.in_channels != flow.output_size:
        raise CheckpointError(f"{where}: hift.in_channels != flow.output_size")
    return DecoderConfig(sample_rate=sample_rate, flow=flow, hift=hift)


def load_config(path: str | Path) -> DecoderConfig:
    """Read and parse a decoder ``config.yaml`` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(f"decoder config not found at {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read decoder config {path}: {exc}") from exc
    return parse_config(text, str(path))
