"""Transfusion: predict the next token and diffuse images with one transformer."""

__version__ = "0.1.0"
