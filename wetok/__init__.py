"""WeTok lab: group-wise lookup-free quantization tokenizer with a generative decoder."""
