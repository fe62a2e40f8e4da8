"""
Presence webhooks: tell an app's backend who is online.

The hub reports presence transitions to a L{emitter.WebhookEmitter}, which
debounces them (a reconnect inside the grace sends nothing), turns them into
L{events.WebhookEvent}s and writes them to a durable L{outbox} before they
count as emitted. A L{dispatcher.WebhookDispatcher} reads each app's outbox
in order and POSTs signed batches (L{signing}) to the app's URL, retrying
with backoff, apart from the messaging hot path.
"""
