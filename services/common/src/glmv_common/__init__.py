"""Code shared by the GLM-4-Voice services and the gateway (no torch here)."""
