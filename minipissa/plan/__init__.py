"""which modules, with which settings; the factor stream; the one installer of layers."""
