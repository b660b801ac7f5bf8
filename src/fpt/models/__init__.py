"""Model code: the frozen LPM and its hooks, the fusion module, the side ViT, and the assembled methods."""
