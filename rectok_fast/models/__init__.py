"""Models of rectok_fast: tokenizer, semantic decoders, teacher, DiT^DH, discriminator, perceptual nets."""
