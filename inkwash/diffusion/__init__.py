"""inkwash.diffusion"""
