"""Turn one declarative project file into reproducible GPU service images.

Stages, one module each, data flowing one way:
spec -> lock -> plan -> render -> build -> (publish, smoke, select).
"""

__version__ = "0.1.0"
