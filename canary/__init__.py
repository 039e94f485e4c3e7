"""Canary Collab: real-time collaboration sessions over WebSockets.

The application is built by `canary.app.create_app`; `wsgi.py` serves it.
"""
