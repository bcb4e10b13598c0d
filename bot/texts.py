"""Everything the bot says, in English and Russian. ``t(lang, key, **values)`` picks and fills one.

A missing Russian text falls back to English, so a new key never breaks a conversation.
"""

from __future__ import annotations

LANGUAGES = ("en", "ru")

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "start": (
            "Hi! I learn the style of your stickers and turn your photos into stickers in it.\n\n"
            "1. Send me at least 3 stickers or pictures in one style (one by one, as an album, "
            "or a pack link like https://t.me/addstickers/NAME).\n"
            "2. Press «Train» (/train). Training takes a few minutes; I'll keep you posted.\n"
            "3. Send a photo and get a sticker back. Add the ones you like to your own pack.\n\n"
            "/styles your styles · /status your jobs · /cancel · /lang language · /delete_me"
        ),
        "btn_new_style": "➕ New style",
        "btn_train": "🏋️ Train",
        "btn_styles": "🎨 My styles",
        "btn_help": "❓ Help",
        "btn_another": "🔁 Another variant",
        "btn_add_pack": "➕ Add to my pack",
        "btn_other_style": "🎨 Different style",
        "btn_use": "✅ Use",
        "btn_rename": "✏️ Rename",
        "btn_delete": "🗑 Delete",
        "btn_yes_delete": "Yes, delete",
        "btn_no": "No",
        "btn_yes_delete_all": "Yes, delete everything",
        "new_style_started": (
            "New style «{name}». Send me stickers or pictures in one style (at least 3), "
            "then press «Train»."
        ),
        "draft_added": "Added. The draft «{name}» has {count} usable image(s).",
        "draft_added_many": "Added {added} image(s). The draft «{name}» has {count} usable image(s).",
        "draft_duplicate": "I already have this image in «{name}» ({count} usable).",
        "draft_skipped": "Skipped {skipped}:\n{reasons}",
        "draft_ready_hint": "That's enough to train: press «Train» or send more.",
        "draft_full": "The draft already holds {limit} images, the most a style can have.",
        "too_many_styles": "You have reached the limit of {limit} style(s). Delete one in /styles first.",
        "reason_animated": "animated sticker (only static ones can be used)",
        "reason_video": "video sticker (only static ones can be used)",
        "reason_too_big_file": "the file is over {mb} MB, the most bots may download",
        "reason_not_image": "not an image ({detail})",
        "reason_bad_path": "Telegram gave an unusable file path",
        "reason_download": "the download failed",
        "unsupported_document": (
            "«{name}» is not an image I can use. Send PNG, JPEG or WEBP pictures or static stickers."
        ),
        "image_rejected": "I can't use this image: {reason}",
        "import_started": "Importing the pack «{name}» ({total} stickers)…",
        "import_progress": "Importing «{name}»: {done}/{total}…",
        "import_done": "Imported {added} image(s) from «{name}». The draft «{draft}» has {count} usable.",
        "import_not_found": "I can't find a sticker pack named «{name}».",
        "import_resumed": "I was restarted while importing «{name}»; going on from {done}/{total}…",
        "import_interrupted": (
            "The import of «{name}» was interrupted and could not go on. What was imported is kept; "
            "send the link again for the rest."
        ),
        "import_bad_name": (
            "«{name}» is not a sticker pack name. Send /import NAME or a t.me/addstickers/NAME link."
        ),
        "import_usage": "Send /import NAME or a link like https://t.me/addstickers/NAME.",
        "train_no_draft": "There is nothing to train yet. Send me at least 3 stickers or pictures first.",
        "train_too_few": "The draft «{name}» has {count} usable image(s); training needs at least {min}.",
        "train_ask_noun": (
            "What do your stickers show? Pick one below or send one or two English words "
            "(for example: cat, cartoon girl, robot)."
        ),
        "train_unknown_noun": (
            "I don't know «{word}». Pick what your stickers show below, or send one or two "
            "English words (for example: cat, cartoon girl)."
        ),
        "train_queued": (
            "🏋️ Training «{name}» ({noun}, {count} images) is queued: position {position}{eta}."
        ),
        "eta": ", about {minutes} min",
        "train_running": "🏋️ Training «{name}»: {percent}%{detail}",
        "train_class_images": "preparing class images {done}/{total}",
        "train_class_images_wait": "waiting for class images another job is making",
        "train_progress_done": "🏋️ Training «{name}»: 100% ✅",
        "train_ready": (
            "🎉 Your style «{name}» is ready and active! Send me a photo and I'll turn it into a sticker."
        ),
        "train_failed": "😞 Training «{name}» failed: {error}. Your images are kept; /train to try again.",
        "train_cancelled": "Training «{name}» was cancelled. Your images are kept in the draft.",
        "train_busy": "«{name}» is already training. /status shows how it goes.",
        "sticker_no_style": (
            "You have no ready style yet. Send me stickers in one style first, then /train."
        ),
        "sticker_queued": "🎨 Drawing your sticker in «{name}»… (position {position}{eta})",
        "sticker_getting_ready": (
            "⏳ Getting ready: on its first start the bot is learning to cut stickers out of their "
            "background{eta}. Your sticker in «{name}» comes right after."
        ),
        "sticker_running": "🎨 Drawing your sticker in «{name}»: {percent}%",
        "sticker_failed": "😞 I couldn't draw that sticker: {error}",
        "sticker_withheld": (
            "🙈 {count} sticker(s) not sent: the safety filter flagged the picture as possibly "
            "explicit. Try another photo."
        ),
        "sticker_cancelled": "The sticker job was cancelled.",
        "sticker_caption": "Style «{name}» · {emoji}",
        "sticker_quota": "You've made {limit} stickers today, the daily limit. Come back tomorrow!",
        "queue_quota": "You already have {limit} jobs waiting. Wait for them or /cancel.",
        "queue_unavailable": "The job queue is unavailable right now. Please try again in a minute.",
        "photo_gone": "I no longer have the photo for this sticker. Send it again.",
        "pack_added": "Added to your pack: {link}",
        "pack_created": "Created your pack with this sticker: {link}",
        "pack_already": "This sticker is already in your pack: {link}",
        "pack_full": "Your pack is full (120 stickers, Telegram's limit). Remove some in @Stickers first.",
        "pack_error": "Telegram refused to add the sticker: {error}",
        "styles_none": "You have no styles yet. Send me stickers to start one.",
        "styles_list": "Your styles (✅ = active):",
        "style_card": "Style «{name}»: {status}{noun}. Images: {count}.",
        "status_draft": "draft",
        "status_queued": "queued",
        "status_training": "training",
        "status_ready": "ready",
        "status_failed": "failed",
        "style_switched": "Active style: «{name}». Send a photo!",
        "style_not_ready": "«{name}» is not ready yet ({status}).",
        "style_rename_ask": "Send a new name for «{name}».",
        "style_renamed": "Renamed to «{name}».",
        "style_bad_name": "A name is 1-40 characters of plain text.",
        "style_delete_ask": "Delete «{name}» and its images? This cannot be undone.",
        "style_deleted": "Deleted «{name}».",
        "style_pick": "Pick a style for this photo:",
        "forged": "That button doesn't belong to you or is out of date. Nothing was changed.",
        "status_none": "You have no jobs.",
        "status_line": "{kind} · {state}{extra}",
        "kind_train": "training",
        "kind_sticker": "sticker",
        "kind_noop": "test job",
        "state_queued": "queued",
        "state_running": "running",
        "state_succeeded": "done",
        "state_failed": "failed",
        "state_cancelled": "cancelled",
        "cancelled": "Cancelled {n} job(s).",
        "cancel_nothing": "Nothing to cancel.",
        "delete_me_ask": (
            "This deletes all your styles, images, stickers and jobs from this bot. "
            "Your Telegram sticker pack stays (remove it in @Stickers). Continue?"
        ),
        "delete_me_done": "Everything of yours is deleted. /start to begin again.",
        "kept": "OK, nothing was changed.",
        "lang_pick": "Choose a language:",
        "lang_set": "Language: English.",
        "not_admin": "This command is for the bot's admins.",
        "stats": (
            "Users: {users}\nStyles: {styles}\nStickers: {stickers}\nJobs: {jobs}\n"
            "Queue depth: {depth}\nWorker: {worker}\nBackground remover: {segmenter}"
        ),
        "worker_busy": "busy ({n} running, lease alive)",
        "worker_idle": "idle (last job finished {ago} ago)",
        "worker_never": "no job finished yet",
        "worker_stale": "⚠️ {n} running job(s) with an expired lease: the worker may be down",
        "slow_down": "Too fast! Please wait a moment.",
        "unknown_text": (
            "Send me stickers or pictures for a new style, or a photo to turn into a sticker. /help"
        ),
        "error": "Something went wrong on my side (error id {error_id}). Please try again.",
        "input_error": "{message}",
    },
    "ru": {
        "start": (
            "Привет! Я изучаю стиль твоих стикеров и превращаю фото в стикеры в этом стиле.\n\n"
            "1. Пришли хотя бы 3 стикера или картинки в одном стиле (по одной, альбомом "
            "или ссылкой на пак вида https://t.me/addstickers/NAME).\n"
            "2. Нажми «Обучить» (/train). Обучение займёт несколько минут, я буду сообщать ход.\n"
            "3. Пришли фото и получи стикер. Понравившиеся добавляй в свой пак.\n\n"
            "/styles стили · /status задачи · /cancel · /lang язык · /delete_me"
        ),
        "btn_new_style": "➕ Новый стиль",
        "btn_train": "🏋️ Обучить",
        "btn_styles": "🎨 Мои стили",
        "btn_help": "❓ Помощь",
        "btn_another": "🔁 Ещё вариант",
        "btn_add_pack": "➕ В мой пак",
        "btn_other_style": "🎨 Другой стиль",
        "btn_use": "✅ Выбрать",
        "btn_rename": "✏️ Переименовать",
        "btn_delete": "🗑 Удалить",
        "btn_yes_delete": "Да, удалить",
        "btn_no": "Нет",
        "btn_yes_delete_all": "Да, удалить всё",
        "new_style_started": (
            "Новый стиль «{name}». Пришли стикеры или картинки в одном стиле (хотя бы 3), "
            "потом нажми «Обучить»."
        ),
        "draft_added": "Добавлено. В черновике «{name}» {count} подходящих изображений.",
        "draft_added_many": "Добавлено {added}. В черновике «{name}» {count} подходящих изображений.",
        "draft_duplicate": "Это изображение уже есть в «{name}» ({count} подходящих).",
        "draft_skipped": "Пропущено {skipped}:\n{reasons}",
        "draft_ready_hint": "Этого хватит для обучения: нажми «Обучить» или пришли ещё.",
        "draft_full": "В черновике уже {limit} изображений, больше в стиль не помещается.",
        "too_many_styles": "У тебя уже {limit} стилей, это максимум. Удали один в /styles.",
        "reason_animated": "анимированный стикер (подходят только статичные)",
        "reason_video": "видеостикер (подходят только статичные)",
        "reason_too_big_file": "файл больше {mb} МБ, ботам нельзя скачивать такие",
        "reason_not_image": "не изображение ({detail})",
        "reason_bad_path": "Telegram вернул негодный путь к файлу",
        "reason_download": "не удалось скачать",
        "unsupported_document": (
            "«{name}» — не изображение, которое я могу использовать. Пришли PNG, JPEG, WEBP "
            "или статичные стикеры."
        ),
        "image_rejected": "Не могу использовать это изображение: {reason}",
        "import_started": "Импортирую пак «{name}» ({total} стикеров)…",
        "import_progress": "Импорт «{name}»: {done}/{total}…",
        "import_done": "Импортировано {added} из «{name}». В черновике «{draft}» {count} подходящих.",
        "import_not_found": "Не нашёл стикерпак «{name}».",
        "import_resumed": "Меня перезапустили во время импорта «{name}»; продолжаю с {done}/{total}…",
        "import_interrupted": (
            "Импорт «{name}» прервался и не смог продолжиться. Импортированное сохранено; "
            "пришли ссылку ещё раз, чтобы добавить остальное."
        ),
        "import_bad_name": (
            "«{name}» — не имя стикерпака. Пришли /import NAME или ссылку t.me/addstickers/NAME."
        ),
        "import_usage": "Пришли /import NAME или ссылку вида https://t.me/addstickers/NAME.",
        "train_no_draft": "Пока нечего обучать. Сначала пришли хотя бы 3 стикера или картинки.",
        "train_too_few": (
            "В черновике «{name}» {count} подходящих изображений; для обучения нужно не меньше {min}."
        ),
        "train_ask_noun": (
            "Что изображено на стикерах? Выбери ниже или пришли одно-два слова "
            "(например: кот, мультяшная девушка, робот)."
        ),
        "train_unknown_noun": (
            "Я не знаю слова «{word}». Выбери ниже, что изображено на стикерах, или пришли "
            "одно-два слова по-английски (например: cat, cartoon girl)."
        ),
        "train_queued": (
            "🏋️ Обучение «{name}» ({noun}, {count} изобр.) в очереди: место {position}{eta}."
        ),
        "eta": ", примерно {minutes} мин",
        "train_running": "🏋️ Обучение «{name}»: {percent}%{detail}",
        "train_class_images": "готовлю образцы класса {done}/{total}",
        "train_class_images_wait": "жду образцы класса, их готовит другая задача",
        "train_progress_done": "🏋️ Обучение «{name}»: 100% ✅",
        "train_ready": "🎉 Стиль «{name}» готов и выбран! Пришли фото, и я сделаю из него стикер.",
        "train_failed": "😞 Обучение «{name}» не удалось: {error}. Картинки сохранены; /train — ещё раз.",
        "train_cancelled": "Обучение «{name}» отменено. Картинки остались в черновике.",
        "train_busy": "«{name}» уже обучается. Ход — в /status.",
        "sticker_no_style": "Готового стиля пока нет. Пришли стикеры в одном стиле, затем /train.",
        "sticker_queued": "🎨 Рисую стикер в стиле «{name}»… (место {position}{eta})",
        "sticker_getting_ready": (
            "⏳ Готовлюсь: при первом запуске бот учится вырезать стикеры из фона{eta}. "
            "Стикер в стиле «{name}» будет сразу после."
        ),
        "sticker_running": "🎨 Рисую стикер в стиле «{name}»: {percent}%",
        "sticker_failed": "😞 Не получилось нарисовать стикер: {error}",
        "sticker_withheld": (
            "🙈 Не отправлено стикеров: {count}. Фильтр безопасности счёл картинку, возможно, "
            "непристойной. Попробуй другое фото."
        ),
        "sticker_cancelled": "Задача на стикер отменена.",
        "sticker_caption": "Стиль «{name}» · {emoji}",
        "sticker_quota": "Сегодня сделано {limit} стикеров — это дневной лимит. Приходи завтра!",
        "queue_quota": "У тебя уже {limit} задач в очереди. Подожди или /cancel.",
        "queue_unavailable": "Очередь задач сейчас недоступна. Попробуй через минуту.",
        "photo_gone": "Фото для этого стикера больше нет. Пришли его ещё раз.",
        "pack_added": "Добавлено в твой пак: {link}",
        "pack_created": "Создал твой пак с этим стикером: {link}",
        "pack_already": "Этот стикер уже в твоём паке: {link}",
        "pack_full": "Пак заполнен (120 стикеров — предел Telegram). Удали лишние в @Stickers.",
        "pack_error": "Telegram не принял стикер: {error}",
        "styles_none": "Стилей пока нет. Пришли стикеры, чтобы начать.",
        "styles_list": "Твои стили (✅ — выбранный):",
        "style_card": "Стиль «{name}»: {status}{noun}. Изображений: {count}.",
        "status_draft": "черновик",
        "status_queued": "в очереди",
        "status_training": "обучается",
        "status_ready": "готов",
        "status_failed": "ошибка",
        "style_switched": "Выбран стиль «{name}». Присылай фото!",
        "style_not_ready": "«{name}» ещё не готов ({status}).",
        "style_rename_ask": "Пришли новое имя для «{name}».",
        "style_renamed": "Переименовано в «{name}».",
        "style_bad_name": "Имя — от 1 до 40 символов обычного текста.",
        "style_delete_ask": "Удалить «{name}» вместе с картинками? Это необратимо.",
        "style_deleted": "«{name}» удалён.",
        "style_pick": "Выбери стиль для этого фото:",
        "forged": "Эта кнопка не твоя или устарела. Ничего не изменено.",
        "status_none": "Задач нет.",
        "status_line": "{kind} · {state}{extra}",
        "kind_train": "обучение",
        "kind_sticker": "стикер",
        "kind_noop": "тестовая задача",
        "state_queued": "в очереди",
        "state_running": "выполняется",
        "state_succeeded": "готово",
        "state_failed": "ошибка",
        "state_cancelled": "отменено",
        "cancelled": "Отменено задач: {n}.",
        "cancel_nothing": "Нечего отменять.",
        "delete_me_ask": (
            "Будут удалены все твои стили, картинки, стикеры и задачи в этом боте. "
            "Стикерпак в Telegram останется (удалить его можно в @Stickers). Продолжить?"
        ),
        "delete_me_done": "Всё твоё удалено. /start — начать заново.",
        "kept": "Хорошо, ничего не изменено.",
        "lang_pick": "Выбери язык:",
        "lang_set": "Язык: русский.",
        "not_admin": "Эта команда только для админов бота.",
        "slow_down": "Слишком быстро! Подожди немного.",
        "unknown_text": "Пришли стикеры или картинки для нового стиля или фото, чтобы сделать стикер. /help",
        "error": "У меня что-то сломалось (код ошибки {error_id}). Попробуй ещё раз.",
        "input_error": "{message}",
    },
}


def t(lang: str | None, key: str, **values: object) -> str:
    """The text ``key`` in ``lang`` (English when missing), filled with ``values``."""
    table = TEXTS.get(lang or "en", TEXTS["en"])
    template = table.get(key) or TEXTS["en"][key]
    return template.format(**values) if values else template


def pick_language(stored: str | None, language_code: str | None, default: str) -> str:
    """The user's choice if any, else Telegram's ``language_code`` (ru*/en*), else ``default``."""
    if stored in LANGUAGES:
        return stored
    code = (language_code or "").lower()
    for lang in LANGUAGES:
        if code == lang or code.startswith(lang + "-"):
            return lang
    return default
