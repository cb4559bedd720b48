"""Optional parts built on the core: the Eventor-style flow API and the demo."""
