"""Patch and pixel features: preprocessing, extraction from any ViT, classical filter banks, PCA, caches, large
images and pictures of features."""
