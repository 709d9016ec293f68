"""The directory gradscope puts first on its children's PYTHONPATH: only ``sitecustomize.py`` (see that module)."""
