"""Sparse autoencoders: one base class, one file per architecture, training, and folder I/O.

- `registry`: architecture names -> classes, and the validation every caller shares;
- `base`: `SAESpec` (what an SAE is) and the `SAE` module; `sparse`: the sparse kernels;
- `jumprelu`, `topk`, `batchtopk`, `matryoshka`, `relu`: the architectures;
- `train`: the training loop; `checkpoint`: resumable state; `train_layer`: one layer's job;
- `io`: our folders (SAELens-loadable), SAELens, Gemma Scope and sparsify folders.

Nothing is imported here, so `token_journey.sae.registry` stays importable without torch.
"""
