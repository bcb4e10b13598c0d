"""A loopback fake of the Telegram Bot API, for the real aiogram client to talk HTTP to.

It speaks the methods the bot uses (getMe, getUpdates with long polling, sendMessage,
editMessageText, deleteMessage, sendSticker, getFile + file download, getStickerSet,
createNewStickerSet, addStickerToSet, answerCallbackQuery, setMyCommands), records every call,
lets a test inject updates as a user would, and can answer the next call of a method with a 429
``retry_after`` (or any error). Only the transport is fake: nothing of the bot is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

BOT_ID = 777000
BOT_USERNAME = "test_stickers_bot"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    at: float  # time.monotonic()

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id", self.params.get("user_id"))
        return int(value) if value is not None else None

    @property
    def text(self) -> str:
        return str(self.params.get("text", ""))


@dataclass
class FakeFile:
    data: bytes
    file_path: str
    file_size: int


@dataclass
class FakeUser:
    id: int
    first_name: str = "Ann"
    language_code: str = "en"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "is_bot": False, "first_name": self.first_name,
                "language_code": self.language_code}


@dataclass
class Injected:
    update_id: int
    user_id: int
    at: float  # time.monotonic() when the update became available


def _value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


class FakeBotAPI:
    def __init__(self, token: str, *, username: str = BOT_USERNAME) -> None:
        self.token = token
        self.username = username
        self.calls: list[Call] = []
        self.files: dict[str, FakeFile] = {}
        self.sticker_sets: dict[str, dict[str, Any]] = {}
        self.download_delay = 0.0  # seconds each file download takes (slow network)
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # (chat, id) -> message
        self.injected: list[Injected] = []
        self.failures: dict[str, list[tuple[int, str, int | None]]] = {}
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._new_update = asyncio.Event()
        self._new_call = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.served_updates = 0

    # --- server ---------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._handle)
        app.router.add_get("/file/bot{token}/{path:.*}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def close(self) -> None:
        self._new_update.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what a test does as a user ---------------------------------------------------------
    def add_file(self, data: bytes, *, file_path: str | None = None, size: int | None = None,
                 kind: str = "photos", suffix: str = ".jpg") -> str:
        n = next(self._file_ids)
        file_id = f"FILE{n:05d}"
        path = file_path if file_path is not None else f"{kind}/file_{n}{suffix}"
        self.files[file_id] = FakeFile(data, path, len(data) if size is None else size)
        return file_id

    def _inject(self, user: FakeUser, update: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        update["update_id"] = update_id
        self._updates.append(update)
        self.injected.append(Injected(update_id, user.id, time.monotonic()))
        self._new_update.set()
        return update_id

    def _user_message(self, user: FakeUser, **content: Any) -> dict[str, Any]:
        return {"message_id": next(self._message_ids), "date": int(time.time()),
                "chat": {"id": user.id, "type": "private", "first_name": user.first_name},
                "from": user.as_dict(), **content}

    def send_text(self, user: FakeUser, text: str) -> int:
        content: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            command = text.split()[0]
            content["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self._inject(user, {"message": self._user_message(user, **content)})

    def send_photo(self, user: FakeUser, file_id: str, *, width: int = 64, height: int = 64,
                   media_group_id: str | None = None) -> int:
        size = self.files[file_id].file_size if file_id in self.files else 1000
        photo = [{"file_id": file_id, "file_unique_id": "u" + file_id, "width": width,
                  "height": height, "file_size": size}]
        content: dict[str, Any] = {"photo": photo}
        if media_group_id:
            content["media_group_id"] = media_group_id
        return self._inject(user, {"message": self._user_message(user, **content)})

    def send_document(self, user: FakeUser, file_id: str, *, file_name: str, mime_type: str) -> int:
        doc = {"file_id": file_id, "file_unique_id": "u" + file_id, "file_name": file_name,
               "mime_type": mime_type, "file_size": self.files[file_id].file_size}
        return self._inject(user, {"message": self._user_message(user, document=doc)})

    def sticker_object(self, file_id: str, *, is_animated: bool = False,
                       is_video: bool = False) -> dict[str, Any]:
        return {"file_id": file_id, "file_unique_id": "u" + file_id, "type": "regular",
                "width": 512, "height": 512, "is_animated": is_animated, "is_video": is_video,
                "file_size": self.files[file_id].file_size if file_id in self.files else 100}

    def send_sticker(self, user: FakeUser, file_id: str, *, is_animated: bool = False,
                     is_video: bool = False) -> int:
        sticker = self.sticker_object(file_id, is_animated=is_animated, is_video=is_video)
        return self._inject(user, {"message": self._user_message(user, sticker=sticker)})

    def press(self, user: FakeUser, data: str, *, message: dict[str, Any] | None = None) -> int:
        if message is None:
            message = {"message_id": 1, "date": int(time.time()),
                       "chat": {"id": user.id, "type": "private"}, "text": "..."}
        query = {"id": f"cq{next(self._update_ids)}", "from": user.as_dict(), "chat_instance": "ci",
                 "data": data, "message": message}
        return self._inject(user, {"callback_query": query})

    def add_sticker_set(self, name: str, stickers: list[dict[str, Any]], title: str = "A pack") -> None:
        self.sticker_sets[name] = {"name": name, "title": title, "sticker_type": "regular",
                                   "stickers": stickers}

    def fail_next(self, method: str, *, code: int = 429, description: str = "Too Many Requests",
                  retry_after: int | None = 1) -> None:
        self.failures.setdefault(method, []).append((code, description, retry_after))

    # --- what a test checks -----------------------------------------------------------------
    def calls_to(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [c for c in self.calls
                if c.method == method and (chat_id is None or c.chat_id == chat_id)]

    def texts_to(self, chat_id: int) -> list[str]:
        return [c.text for c in self.calls if c.method in ("sendMessage", "editMessageText")
                and c.chat_id == chat_id]

    def buttons(self, call: Call) -> list[tuple[str, str]]:
        markup = call.params.get("reply_markup") or {}
        return [(b["text"], b.get("callback_data", "")) for row in markup.get("inline_keyboard", [])
                for b in row]

    async def wait_for(self, predicate: Callable[[Call], bool], *, timeout: float = 10.0,  # noqa: ASYNC109
                       start: int = 0) -> Call:
        """The first call from index ``start`` on that matches, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.calls):
                if predicate(self.calls[index]):
                    return self.calls[index]
                index += 1
            left = deadline - time.monotonic()
            if left <= 0:
                recent = [(c.method, c.text[:80]) for c in self.calls[-8:]]
                raise TimeoutError(f"no matching Bot API call within {timeout} s; last: {recent}")
            self._new_call.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_call.wait(), timeout=min(left, 0.5))

    async def wait_text(self, chat_id: int, needle: str, *, timeout: float = 10.0,  # noqa: ASYNC109
                        start: int = 0) -> Call:
        return await self.wait_for(
            lambda c: c.method in ("sendMessage", "editMessageText") and c.chat_id == chat_id
            and needle in c.text, timeout=timeout, start=start)

    # --- the HTTP side ----------------------------------------------------------------------
    def _ok(self, result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    def _error(self, code: int, description: str, retry_after: int | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=code)

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, web.FileField):
                files[key] = value.file.read()
            else:
                params[key] = _value(str(value))
        if method != "getUpdates":
            self.calls.append(Call(method, params, files, time.monotonic()))
            self._new_call.set()
        queued = self.failures.get(method)
        if queued:
            code, description, retry_after = queued.pop(0)
            if retry_after is not None:
                description = f"{description}: retry after {retry_after}"
            return self._error(code, description, retry_after)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, f"Not Found: method {method} not found")
        return await handler(params, files)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        if self.download_delay:
            await asyncio.sleep(self.download_delay)
        for file in self.files.values():
            if file.file_path == path:
                return web.Response(body=file.data)
        return web.Response(status=404)

    def _bot_message(self, chat_id: int, **content: Any) -> dict[str, Any]:
        message = {"message_id": next(self._message_ids), "date": int(time.time()),
                   "chat": {"id": chat_id, "type": "private"},
                   "from": {"id": BOT_ID, "is_bot": True, "first_name": "Bot", "username": self.username},
                   **content}
        self.messages[(chat_id, message["message_id"])] = message
        return message

    async def _m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        return self._ok({"id": BOT_ID, "is_bot": True, "first_name": "Sticker bot",
                         "username": self.username})

    async def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        return self._ok(True)

    async def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        return self._ok(True)

    async def _m_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        # Confirmed updates (below offset) are gone for good, as in Telegram.
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        while not self._updates:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._ok([])
            self._new_update.clear()
            try:
                await asyncio.wait_for(self._new_update.wait(), timeout=left)
            except TimeoutError:
                return self._ok([])
        batch = self._updates[:100]
        self.served_updates += len(batch)
        return self._ok(batch)

    async def _m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        content: dict[str, Any] = {"text": str(params["text"])}
        if params.get("reply_markup"):
            content["reply_markup"] = params["reply_markup"]
        return self._ok(self._bot_message(int(params["chat_id"]), **content))

    async def _m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self.messages.get(key)
        if message is None:
            return self._error(400, "Bad Request: message to edit not found")
        if message.get("text") == params["text"] and not params.get("reply_markup"):
            return self._error(400, "Bad Request: message is not modified: specified new message "
                                    "content and reply markup are exactly the same")
        message["text"] = str(params["text"])
        message.pop("reply_markup", None)
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        return self._ok(message)

    async def _m_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        key = (int(params["chat_id"]), int(params["message_id"]))
        if self.messages.pop(key, None) is None:
            return self._error(400, "Bad Request: message to delete not found")
        return self._ok(True)

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        return self._ok(True)

    def _input_file(self, ref: Any, files: dict[str, bytes]) -> tuple[str, bytes] | None:
        """A file id (existing file) or ``attach://name`` (an uploaded part)."""
        ref = str(ref)
        if ref.startswith("attach://"):
            data = files.get(ref.removeprefix("attach://"))
            if data is None:
                return None
            return self.add_file(data, kind="stickers", suffix=".webp"), data
        if ref in self.files:
            return ref, self.files[ref].data
        return None

    async def _m_sendSticker(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        ref = params.get("sticker")
        got = self._input_file(ref, files) if ref is not None else None
        if got is None and "sticker" in files:
            data = files["sticker"]
            got = (self.add_file(data, kind="stickers", suffix=".webp"), data)
        if got is None:
            return self._error(400, "Bad Request: wrong file identifier/HTTP URL specified")
        file_id, _ = got
        content: dict[str, Any] = {"sticker": self.sticker_object(file_id)}
        if params.get("reply_markup"):
            content["reply_markup"] = params["reply_markup"]
        return self._ok(self._bot_message(int(params["chat_id"]), **content))

    async def _m_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        file = self.files.get(str(params.get("file_id")))
        if file is None:
            return self._error(400, "Bad Request: invalid file_id")
        return self._ok({"file_id": params["file_id"], "file_unique_id": "u" + str(params["file_id"]),
                         "file_size": file.file_size, "file_path": file.file_path})

    async def _m_getStickerSet(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        pack = self.sticker_sets.get(str(params.get("name")))
        if pack is None:
            return self._error(400, "Bad Request: STICKERSET_INVALID")
        return self._ok(pack)

    def _sticker_items(self, raw: list[dict[str, Any]],
                       files: dict[str, bytes]) -> list[dict[str, Any]] | None:
        items = []
        for item in raw:
            got = self._input_file(item.get("sticker"), files)
            if got is None or item.get("format") != "static" or not item.get("emoji_list"):
                return None
            file_id, _ = got
            items.append({**self.sticker_object(file_id), "emoji": item["emoji_list"][0]})
        return items

    async def _m_createNewStickerSet(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        name = str(params.get("name", ""))
        if not name.endswith(f"_by_{self.username}") or "__" in name or len(name) > 64:
            return self._error(400, "Bad Request: invalid sticker set name is specified")
        if name in self.sticker_sets:
            return self._error(400, "Bad Request: sticker set name is already occupied")
        items = self._sticker_items(params.get("stickers") or [], files)
        if not items or len(items) > 50:
            return self._error(400, "Bad Request: STICKER_PNG_NOPNG")
        self.sticker_sets[name] = {"name": name, "title": str(params.get("title", "")),
                                   "sticker_type": "regular", "stickers": items,
                                   "owner": int(params["user_id"])}
        return self._ok(True)

    async def _m_addStickerToSet(self, params: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        pack = self.sticker_sets.get(str(params.get("name")))
        if pack is None:
            return self._error(400, "Bad Request: STICKERSET_INVALID")
        if len(pack["stickers"]) >= 120:
            return self._error(400, "Bad Request: STICKERS_TOO_MUCH")
        items = self._sticker_items([params.get("sticker") or {}], files)
        if not items:
            return self._error(400, "Bad Request: STICKER_PNG_NOPNG")
        pack["stickers"].extend(items)
        return self._ok(True)


def user(user_id: int, *, lang: str = "en", first_name: str = "Ann") -> FakeUser:
    return FakeUser(user_id, first_name, lang)


__all__ = ["BOT_USERNAME", "Call", "FakeBotAPI", "FakeUser", "Injected", "user"]
