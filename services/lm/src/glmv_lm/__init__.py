"""glmv_lm."""
