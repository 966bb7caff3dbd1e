"""Third-party integrations (transformers quantizer registration)."""
