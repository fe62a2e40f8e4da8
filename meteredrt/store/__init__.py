"""
Everything meteredrt keeps durably, in one place: SQLite files in the data
directory (the embedded default) or one PostgreSQL database.

  - L{meteredrt.store.database}: where the store is (L{Database}) and how
    connections are opened and time-limited, for the server (C{adbapi}
    pools) and the command line (synchronous connections).
  - L{meteredrt.store.dialect}: the SQL that differs between the two
    databases; nothing outside this package sees it.
  - L{meteredrt.store.schema}: versioned schema creation and upgrades.
  - L{meteredrt.store.tenancy}: stored apps and keys overlaid by the
    configuration file (pure).
  - L{meteredrt.store.keys}: the tables of apps, plans and keys.
  - L{meteredrt.store.keystore}: the server's L{meteredrt.interfaces.IKeyStore}
    over those tables.
  - L{meteredrt.store.usage}: the usage counters and the billing ledger.
  - L{meteredrt.store.webhooks}: the presence webhook outbox
    (L{meteredrt.store.webhooks.StoreOutbox}).

Each group of tables is a I{component} with its own migrations
(C{COMPONENT} and C{MIGRATIONS} in its module). A new one is one more
module beside these: its tables, its migrations, its store.
"""
