"""
L{meteredrt.interfaces.IPresence} implementations: L{memory.MemoryPresence}
for one node, L{redis.RedisPresence} for a cluster.
"""
