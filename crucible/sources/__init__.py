"""Where weights come from: local folders, the Hugging Face Hub; safetensors headers."""
