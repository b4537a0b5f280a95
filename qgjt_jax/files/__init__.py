"""Reading files users hand us, safely: limits, regular files, images,
folders of people, restricted pickles (docs/TRUST.md)."""
