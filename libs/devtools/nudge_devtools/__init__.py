"""Tooling shared by the demo, the tests and the benchmarks: seeding a workspace, running
the services as real processes, an SMTP sink, and waiting on the pipeline. Never imported
by a service."""
