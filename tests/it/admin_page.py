"""Drives sluice's admin page in headless chromium (selenium + chromedriver) for
tests/it/sessions.rs. Talks to the test over stdin/stdout, one line each way per step:

    -> LOGGED_IN                   (the test then starts `ssh -R`)
    <- WAIT <text>                 waits (no reload: the page refreshes itself) for a session row holding <text>
    -> SEEN <session id>
    <- MOVED                       waits for that row's byte counts to leave 0
    -> COUNTED
    <- KILL                        clicks the row's "End session"
    -> KILLED <message shown>

argv: base URL, token, screenshot path or "-".
"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

base, token, shot = sys.argv[1], sys.argv[2], sys.argv[3]


def say(line):
    print(line, flush=True)


def until(what, f, limit=30):
    deadline = time.time() + limit
    while True:
        try:
            v = f()
            if v:
                return v
        except Exception:  # the live part is replaced under us every few seconds
            pass
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}; page:\n{d.page_source[:4000]}")
        time.sleep(0.2)


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,900"]:
    opts.add_argument(a)
opts.accept_insecure_certs = True
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    d.get(base + "/ui")
    d.find_element(By.NAME, "token").send_keys(token)
    d.find_element(By.CSS_SELECTOR, "form[action='/ui/login'] button").click()
    until("the logged-in page", lambda: d.find_element(By.ID, "sessions"))
    cookie = d.get_cookie("sluice_admin")
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
    assert d.execute_script("return document.cookie") == "", "the login cookie is readable by script"
    say("LOGGED_IN")

    def row_with(text):
        for r in d.find_elements(By.CSS_SELECTOR, "#sessions tr[data-session]"):
            if text in r.text:
                return r
        return None

    cmd, text = sys.stdin.readline().strip().split(" ", 1)
    assert cmd == "WAIT", cmd
    row = until(f"a session row with {text!r}", lambda: row_with(text))
    sid = row.get_attribute("data-session")
    say(f"SEEN {sid}")

    assert sys.stdin.readline().strip() == "MOVED"

    def moved():
        r = d.find_element(By.CSS_SELECTOR, f"#sessions tr[data-session='{sid}']")
        cells = r.find_elements(By.CSS_SELECTOR, "td.n")
        return all(c.text != "0 B" for c in cells)

    until("byte counts that move", moved)
    if shot != "-":
        d.save_screenshot(shot)
    say("COUNTED")

    assert sys.stdin.readline().strip() == "KILL"
    until(
        "the End session button",
        lambda: d.find_element(
            By.CSS_SELECTOR, f"#sessions tr[data-session='{sid}'] form[action='/ui/kill'] button"
        ),
    ).click()
    msg = until("the confirmation", lambda: d.find_element(By.ID, "msg").text)
    until("the row gone", lambda: row_with(text) is None)
    say(f"KILLED {msg}")
finally:
    d.quit()
