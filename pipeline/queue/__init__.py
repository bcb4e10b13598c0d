"""Job queue backends behind one interface: ``base`` (the contract), ``sqlite`` (embedded,
the default), ``celery`` (scale-out on Redis)."""
