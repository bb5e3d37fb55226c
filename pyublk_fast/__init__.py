"""pyublk_fast: write Linux ublk block-device servers in Python, served at C speed."""

__version__ = "0.1.0"
