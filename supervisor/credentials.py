"""Who the children run as (--user/--group): the supervisor keeps root to bind privileged ports, its children don't."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Credentials:
    """A resolved user: everything the forked child needs to become it, looked up before fork."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def environment(self) -> dict[str, str]:
        """What a login as this user would set (as systemd's User= does)."""
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home}


def resolve(user: str | None, group: str | None) -> Credentials | None:
    """Look up --user/--group (names or numbers); None when neither is given."""
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise UserError("--user/--group need the supervisor to run as root (it drops privileges for the children)")
    return lookup(user, group)


def lookup(user: str | None, group: str | None) -> Credentials:
    """The user (default: ours) and group (default: the user's) as they exist now; UserError if one does not.
    Needs no privilege: `supervise check` runs it as any user."""
    entry = _user(user) if user is not None else pwd.getpwuid(os.getuid())
    gid = _group(group) if group is not None else entry.pw_gid
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid)))) if user is not None else (gid,)
    return Credentials(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir)


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise UserError(f"--user {name}: no such user") from None


def _group(name: str) -> int:
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise UserError(f"--group {name}: no such group") from None
