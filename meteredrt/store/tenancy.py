"""
The effective apps and keys: what is stored, overlaid by the configuration
file. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs
from attrs import frozen

from meteredrt.apps import App, Key
from meteredrt.config import AppDeclaration


@frozen
class StoredState:
    """
    The rows of the database, as records.
    """

    apps: Mapping[str, App]
    keys: Mapping[str, Key]



@frozen
class Tenancy:
    """
    The effective apps and keys: stored ones overlaid by the configuration.

    A declared app exists even if nothing about it is stored; its declared
    plan (if it declares one) and TURN settings win over stored ones, while
    suspension stays a stored flag. A declared key replaces a stored key of
    the same id. Stored keys of apps nobody knows are not served.
    """

    _apps: Mapping[str, App]
    _keys: Mapping[str, Key]
    _keys_by_app: Mapping[str, tuple[Key, ...]]
    _declared_apps: frozenset[str]

    @classmethod
    def overlay(cls, stored: StoredState, declarations: Iterable[AppDeclaration]) -> Tenancy:
        """
        Combine stored state with the configuration's declarations.
        """
        declarations = tuple(declarations)
        apps = dict(stored.apps)
        declared_keys: dict[str, Key] = {}
        for declaration in declarations:
            declared = declaration.app
            kept = apps.get(declared.app_id)
            plan = declared.plan
            if plan is None and kept is not None:
                plan = kept.plan
            apps[declared.app_id] = attrs.evolve(
                declared, plan=plan, suspended=kept.suspended if kept is not None else declared.suspended
            )
            declared_keys.update((key.key_id, key) for key in declaration.keys)
        keys = {key_id: key for key_id, key in stored.keys.items() if key.app_id in apps}
        keys.update(declared_keys)
        by_app: dict[str, list[Key]] = {}
        for key_id in sorted(keys):
            by_app.setdefault(keys[key_id].app_id, []).append(keys[key_id])
        return cls(
            apps=dict(sorted(apps.items())),
            keys=keys,
            keys_by_app={app_id: tuple(app_keys) for app_id, app_keys in by_app.items()},
            declared_apps=frozenset(declaration.app.app_id for declaration in declarations),
        )

    def key(self, key_id: str) -> Key | None:
        """
        The key with this id, revoked or not, or ``None``.
        """
        return self._keys.get(key_id)

    def app(self, app_id: str) -> App | None:
        """
        The app with this id, or ``None``.
        """
        return self._apps.get(app_id)

    def apps(self) -> list[App]:
        """
        Every app, ordered by id.
        """
        return list(self._apps.values())

    def keys_of(self, app_id: str) -> list[Key]:
        """
        Every key of one app, revoked ones included, ordered by id.
        """
        return list(self._keys_by_app.get(app_id, ()))

    def is_declared(self, app_id: str) -> bool:
        """
        Whether the configuration file declares this app.
        """
        return app_id in self._declared_apps

    def revoked_keys(self, before: Tenancy) -> frozenset[str]:
        """
        The ids of the keys that were active in C{before} and are not now:
        revoked, or gone (a declaration removed from the configuration).
        """
        return frozenset(
            key_id
            for key_id, key in before._keys.items()
            if key.active and not (key_id in self._keys and self._keys[key_id].active)
        )

    def changed_apps(self, other: Tenancy) -> frozenset[str]:
        """
        The ids of the apps whose records differ between this tenancy and
        C{other}: added, or with another plan, suspension or TURN setting.
        Keys are not compared.
        """
        return frozenset(
            app_id
            for app_id in self._apps.keys() | other._apps.keys()
            if self._apps.get(app_id) != other._apps.get(app_id)
        )



@frozen
class AdminChange:
    """
    One change an operator made, as two loads of the key store show it.

    :ivar event: C{app_created}, C{app_suspended}, C{app_resumed},
        C{plan_changed}, C{key_created} or C{key_revoked}.
    :ivar key_id: the key's id (never its secret) for key events.
    """

    event: str
    app_id: str
    key_id: str | None = None


def admin_changes(before: Tenancy, after: Tenancy) -> list[AdminChange]:
    """
    What changed between two loads, apps first, each list ordered by id.
    """
    changes: list[AdminChange] = []
    for app in after.apps():
        old = before.app(app.app_id)
        if old is None:
            changes.append(AdminChange("app_created", app.app_id))
            if app.suspended:
                changes.append(AdminChange("app_suspended", app.app_id))
            continue
        if app.suspended != old.suspended:
            changes.append(AdminChange("app_suspended" if app.suspended else "app_resumed", app.app_id))
        if app.plan != old.plan:
            changes.append(AdminChange("plan_changed", app.app_id))
    for app in after.apps():
        for key in after.keys_of(app.app_id):
            old_key = before.key(key.key_id)
            if old_key is None:
                changes.append(AdminChange("key_created", key.app_id, key.key_id))
                if key.revoked:
                    changes.append(AdminChange("key_revoked", key.app_id, key.key_id))
            elif key.revoked and not old_key.revoked:
                changes.append(AdminChange("key_revoked", key.app_id, key.key_id))
    return changes
