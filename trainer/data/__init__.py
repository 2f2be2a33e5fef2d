"""Readers (folder, HF datasets), decode + transform, and loaders."""
