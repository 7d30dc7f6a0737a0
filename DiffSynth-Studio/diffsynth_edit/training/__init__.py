"""Phase 2: train LoRA (and the STE) from a cache; SFT flow matching or Latent Bridge Matching."""
