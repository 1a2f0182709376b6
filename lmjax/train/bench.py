"""placeholder replaced below"""
def benchmark(**kw): raise SystemExit("bench not ready")
