"""layerfuse.export"""
