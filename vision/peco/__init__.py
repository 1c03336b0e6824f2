"""PeCo (Dong et al., AAAI 2023): a perceptual visual codebook and BEiT-style masked image
modelling. ``moco`` (the self-supervised perceptual model), ``tokenizer`` (VQGAN-style VQ-VAE
with perceptual and adversarial losses), ``masking`` (BEiT's block-wise masks), ``mim`` (the
masked-token prediction model and loss), ``semantics`` (how much the tokens say about labels)."""
