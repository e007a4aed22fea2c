"""The chat service: commands -> store -> fan-out, with its storage adapters."""
