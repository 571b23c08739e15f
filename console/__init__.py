"""The browser console, ``/console/``: server-rendered pages (Jinja2) for the
operating company and for licensees' developers, on the gateway's own
aiohttp application and the same service layer as the admin API and the
CLI (``licensing.registry``, ``metering.usage``), never over HTTP. Pages are
in Simplified Chinese unless the browser chose English (``?lang=en``, kept
in a cookie); every form works without JavaScript; no page runs a script.

Decisions:

- **Users** (``console.users``): ``pdg console-user add|disable|reset``.
  Roles are the admin API's (``licence-admin``, ``finance``, ``auditor``,
  ``viewer``) and ``developer``, bound to one licensee. Only
  ``licence-admin`` changes licences; the others read. A developer sees its
  own licensee's apps, usage and documentation only: any other licensee's
  resource answers 404, and the operating company's pages answer 403.
  Passwords are Argon2id hashes; TOTP (RFC 6238, ``cryptography``) is
  optional per user, each code accepted once.
- **Sessions**: a random 256-bit id in the cookie; only its SHA-256 is
  stored. A session ends after ``console.idle_timeout_seconds`` (default 30
  minutes) without a request, or ``console.session_max_seconds`` (default
  12 hours) after sign-in, at sign-out, or when its user is disabled or has
  the password reset. Each sign-in makes a new session id.
- **Cookies**: ``pdg_console`` (the session) and ``pdg_console_login`` (the
  sign-in form's, 10 minutes) are ``HttpOnly``, ``SameSite=Strict``,
  ``Path=/console/``; ``pdg_console_lang`` is ``SameSite=Lax``. All are
  ``Secure`` when the request came over https, ``server.public_url`` is
  https, or ``console.secure_cookies`` is on.
- **Lock-out**: ``console.lockout_failures`` (default 5) failed sign-ins in a
  row (wrong password or TOTP code) lock the user out for
  ``console.lockout_seconds`` (default 15 minutes), during which even the
  right password is refused. The page never says which part was wrong;
  the admin audit log does. Failed sign-ins also count against the
  credential throttle per name and per address (``gateway.throttle``).
- **CSRF**: every form carries a synchronizer token, HMAC-SHA256 of the
  session id (the sign-in form: of its own cookie), so nothing more is
  stored and a page of another site can neither read nor forge it. A POST
  without the right token, or from another ``Origin``, is refused with a
  403 page before anything is read or changed.
- **Audit**: every sign-in attempt (outcome and address, never the
  password or code), sign-out and change made in the console goes to the
  admin audit log (``ledger.admin_log``), as ``console:<user> (<role>)``.
"""

#: The roles a console user may hold.
ROLES = ("licence-admin", "finance", "auditor", "viewer", "developer")
