"""layerfuse.fusion"""
