"""Making a sticker from a photo: BLIP captions, prompts, img2img with the user's adapter,
post-processing to a Telegram sticker, and ``make_sticker`` that runs them in order."""
