"""Export-friendly PyTorch definition of Qwen3-VL that loads the Hugging Face checkpoint."""
