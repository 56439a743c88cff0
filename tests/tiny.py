"""Tiny model sizes shared by the tests (CPU-fast, same code paths as the real sizes)."""
TINY_VIT = {'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 8}
TINY_IMAGE = 32
TINY_MED = {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
            'vocab_size': 30524, 'max_position_embeddings': 64, 'encoder_width': 32}
