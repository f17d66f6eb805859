"""Fixtures shared by the test suites: fake agents, broken plugins (and, later, platform emulators).

Installed as a real distribution so that entry-point discovery is exercised exactly as in production.
"""
