"""inkwash: text-to-image diffusion, DDPM to FLUX, in one readable codebase."""

__version__ = "0.1.0"
