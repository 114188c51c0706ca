"""DLA layers and language models (``dla_ops.models``). Empty until the models issue lands."""
