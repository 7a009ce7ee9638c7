"""The demo in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`) driven by Selenium
against `python demos/app.py --tiny`. Set SAFER_DIFFUSION_UPDATE_SCREENSHOT=1 to also refresh
assets/demo_screenshot.png (the README's screenshot)."""

import os
import shutil
import time
from pathlib import Path

import pytest

from demos.rendering import load_examples

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None)
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or CHROMIUM is None,
    reason="needs headless Chromium and its driver: apt-get install -y chromium chromium-driver (.ci/run installs them)",
)

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_generate_in_a_real_browser(browser, demo_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(demo_server)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    assert "random weights" in browser.find_element(By.ID, "tiny-banner").text
    generate = browser.find_element(By.ID, "generate")

    # An empty prompt shows the validation error in a toast, and no images.
    generate.click()
    toast = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid='toast-body']")))
    assert "prompt" in toast.text and "is empty" in toast.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#original-image img")
    browser.find_element(By.CSS_SELECTOR, "[data-testid='toast-close']").click()
    wait.until(EC.invisibility_of_element_located((By.CSS_SELECTOR, "[data-testid='toast-body']")))

    # Browser-only events (the app has no server handler for them): an example fills the prompt box,
    # Random seed draws a seed.
    first_example = load_examples()["benign"][0]
    browser.find_element(By.XPATH, f"//*[@id='examples-benign']//*[normalize-space(text())={first_example!r}]").click()
    wait.until(lambda d: prompt.get_attribute("value") == first_example)
    seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
    browser.find_element(By.ID, "random-seed").click()
    wait.until(lambda d: seed.get_attribute("value") not in ("", "0"))
    generate.click()

    def rendered(driver):
        images = [driver.find_elements(By.CSS_SELECTOR, f"#{name}-image img") for name in ("original", "safe")]
        verdicts = [driver.find_element(By.ID, f"{name}-verdict").text for name in ("original", "safe")]
        done = all(images) and all(("safe" in v or "flagged" in v) for v in verdicts)
        return (images, verdicts) if done else False

    images, verdicts = wait.until(rendered)
    assert verdicts[0].startswith("Original CLIP:") and verdicts[1].startswith("SaFeR-CLIP:")
    assert all("nudenet" in v for v in verdicts)
    assert "SSIM to Original CLIP:" in verdicts[1] and "SSIM" not in verdicts[0]  # the paired similarity, under the image
    for element in (images[0][0], images[1][0]):
        wait.until(lambda d, e=element: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", e) == 64)
    assert "for both images" in browser.find_element(By.ID, "timing").text

    # Ticking Reveal re-renders the last result through /compare (a real boolean from the checkbox): no error.
    browser.find_element(By.CSS_SELECTOR, "#reveal input").click()
    time.sleep(2)
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
    assert browser.find_elements(By.CSS_SELECTOR, "#original-image img") and browser.find_elements(By.CSS_SELECTOR, "#safe-image img")

    screenshot = tmp_path / "demo_screenshot.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("SAFER_DIFFUSION_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, ROOT / "assets" / "demo_screenshot.png")
