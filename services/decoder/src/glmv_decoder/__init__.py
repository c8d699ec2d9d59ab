"""glmv_decoder."""
