"""
A headless Chromium for the tests, in a process of its own: Playwright's synchronous API runs
its own asyncio loop, which must not meet the test process's trio-asyncio.

Run as ``python tests/browser.py CHROMIUM``; it reads one JSON command per line on stdin,
``{"do": NAME, "args": [...]}``, runs ``NAME(page, *args)`` below and answers one JSON line,
``{"ok": RESULT}`` or ``{"error": "what went wrong"}``. Timeouts are in seconds. It ends with
stdin. `Browser` in ``tests/test_dashboard.py`` is the other end.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from playwright.sync_api import Page, expect, sync_playwright


def goto(page: Page, url: str, timeout: float) -> None:
    page.goto(url, timeout=timeout * 1000)


def _row(page: Page, table: str, key: str) -> Any:
    return page.locator(f"#{table} tbody tr[data-key={json.dumps(key)}]")


def expect_row(page: Page, table: str, key: str, texts: list[str], timeout: float) -> None:
    """The row of *table* keyed *key* is there and shows every one of *texts*."""
    found = _row(page, table, key)
    expect(found).to_have_count(1, timeout=timeout * 1000)
    for text in texts:
        expect(found).to_contain_text(text, timeout=timeout * 1000)


def expect_no_row(page: Page, table: str, key: str, timeout: float) -> None:
    expect(_row(page, table, key)).to_have_count(0, timeout=timeout * 1000)


def expect_no_row_with(page: Page, table: str, containing: str, timeout: float) -> None:
    """No row of *table* contains *containing*."""
    rows = page.locator(f"#{table} tbody tr", has_text=containing)
    expect(rows).to_have_count(0, timeout=timeout * 1000)


def expect_cell(page: Page, table: str, key: str, column: int, text: str, timeout: float) -> None:
    """Cell *column* (1-based) of that row reads exactly *text*."""
    cell = _row(page, table, key).locator(f"td:nth-child({column})")
    expect(cell).to_have_text(text, timeout=timeout * 1000)


def row_text(page: Page, table: str, containing: str, timeout: float) -> str:
    """The text of the first row of *table* that contains *containing*."""
    found = page.locator(f"#{table} tbody tr", has_text=containing).first
    return str(found.inner_text(timeout=timeout * 1000))


def click_in_row(
    page: Page, table: str, containing: str, button: str, answer: str, timeout: float
) -> None:
    """Click *button* in the first row of *table* containing *containing*; answer a prompt."""
    page.once("dialog", lambda dialog: dialog.accept(answer))
    found = page.locator(f"#{table} tbody tr", has_text=containing).first
    found.get_by_role("button", name=button).click(timeout=timeout * 1000)


def expect_text(page: Page, selector: str, text: str, timeout: float) -> None:
    """The element *selector* contains *text*."""
    expect(page.locator(selector)).to_contain_text(text, timeout=timeout * 1000)


def screenshot(page: Page, path: str) -> None:
    page.screenshot(path=path, full_page=True)


COMMANDS = {
    f.__name__: f
    for f in (
        goto,
        expect_row,
        expect_no_row,
        expect_no_row_with,
        expect_cell,
        row_text,
        click_in_row,
        expect_text,
        screenshot,
    )
}


def main(executable: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        print(json.dumps({"ok": browser.version}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            try:
                result = COMMANDS[command["do"]](page, *command["args"])
            except Exception as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            else:
                print(json.dumps({"ok": result}), flush=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1])
