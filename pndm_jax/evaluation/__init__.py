"""Sample-quality evaluation: FID with pytorch-fid's Inception-v3 (`inception`, `fid`) and
FD-digits with the project's digits classifier (`digits_classifier`)."""
