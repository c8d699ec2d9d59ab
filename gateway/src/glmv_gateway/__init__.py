"""glmv_gateway."""
