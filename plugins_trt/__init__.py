"""layerfuse.plugins_trt"""
