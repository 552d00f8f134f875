"""labelers"""
