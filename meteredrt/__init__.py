"""
meteredrt: a self-hostable, wire-compatible server for the Metered Realtime
Messaging protocol, on Twisted and Autobahn.
"""
