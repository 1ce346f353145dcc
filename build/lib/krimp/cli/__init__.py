"""The krimp command line: one file per verb, all thin shells over krimp's Python API."""
