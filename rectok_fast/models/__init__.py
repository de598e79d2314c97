"""Models of rectok_fast: tokenizer, semantic decoders, teacher, DiT^DH, discriminator, perceptual nets.

Named variants (official sizes, tiny/demo sizes, decode-only twins) live in :mod:`.registry`.
"""
