"""glmv_tokenizer."""
