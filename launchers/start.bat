@echo off
rem Apertis Studio launcher for Windows (double-click it): finds Python 3.10+ (the py launcher first, never
rem the Microsoft Store alias), creates or reuses the virtual environment .venv in the app folder, then hands
rem over to launchers\bootstrap.py, which installs what changed and starts the studio. Arguments are passed
rem on. The window stays open after a failure so the message can be read.
setlocal EnableExtensions
rem pushd, not cd: it also enters a folder on a network share (\\server\share), giving it a drive letter.
pushd "%~dp0.."
if not exist "launchers\bootstrap.py" goto :no_folder

rem The app's own packages only: nothing from the user's Python setup may leak into the venv or the studio.
set "PYTHONPATH="
set "PYTHONHOME="
set "PYTHONNOUSERSITE=1"

set "VENV_PY=%CD%\.venv\Scripts\python.exe"
call :python_ok "%VENV_PY%"
if not errorlevel 1 goto :run
if exist ".venv" (
    echo The virtual environment in "%CD%\.venv" does not work any more; making a new one.
    rmdir /s /q ".venv"
)

call :find_python
if errorlevel 1 goto :no_python
echo Creating the virtual environment in "%CD%\.venv" with %PY_SHOW% ...
"%PY_EXE%" %PY_VER% -m venv ".venv"
if errorlevel 1 goto :no_venv

:run
"%VENV_PY%" "%CD%\launchers\bootstrap.py" %*
set "STATUS=%ERRORLEVEL%"
rem 130 is a Ctrl-C: the user stopped it on purpose, so there is nothing to read.
if "%STATUS%"=="0" exit /b 0
if "%STATUS%"=="130" exit /b 130
echo.
echo Apertis Studio stopped with an error (exit code %STATUS%): the message above says what to do.
pause
exit /b %STATUS%

rem ---- subroutines ----

:python_ok
rem errorlevel 0 when the program given (with the py launcher: and its version switch) is Python 3.10+.
"%~1" %~2 -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" >nul 2>&1
exit /b %ERRORLEVEL%

:find_python
rem Sets PY_EXE, PY_VER and PY_SHOW. APERTIS_PYTHON wins; then the py launcher, asking first for the versions
rem the pinned requirements are known to install on; then python.exe on PATH outside WindowsApps, where the
rem Store alias opens the Store instead of running Python. The loops test PY_EXE instead of leaving early:
rem not every cmd honours an exit from inside a FOR body.
set "PY_EXE="
if defined APERTIS_PYTHON goto :use_apertis_python
for %%V in (-3.12 -3.11 -3.13 -3.10 -3) do if not defined PY_EXE call :try_python py %%V
for /f "delims=" %%P in ('where python 2^>nul') do if not defined PY_EXE call :try_path "%%P"
if defined PY_EXE exit /b 0
exit /b 1

:use_apertis_python
call :try_python "%APERTIS_PYTHON%"
exit /b %ERRORLEVEL%

:try_path
set "CANDIDATE=%~1"
rem Removing "\WindowsApps\" changes the path only when it is the Store alias.
if /i not "%CANDIDATE:\WindowsApps\=%"=="%CANDIDATE%" exit /b 1
call :try_python "%~1"
exit /b %ERRORLEVEL%

:try_python
call :python_ok "%~1" %2
if errorlevel 1 exit /b 1
set "PY_EXE=%~1"
set "PY_VER=%~2"
set "PY_SHOW=%~1 %~2"
exit /b 0

:no_folder
echo ERROR: cannot find launchers\bootstrap.py in the app folder above %~dp0
echo Keep start.bat inside the launchers folder of the app (or download the app again), then start it again.
pause
exit /b 1

:no_python
echo ERROR: Apertis Studio needs Python 3.10 or newer, and none was found.
if defined APERTIS_PYTHON echo APERTIS_PYTHON is set to "%APERTIS_PYTHON%", which is not Python 3.10 or newer.
echo Install Python 3.12 from https://www.python.org/downloads/windows/ (keep "py launcher" ticked),
echo or run:  winget install Python.Python.3.12
echo then double-click start.bat again. (The "python" that opens the Microsoft Store is not an installed Python.)
pause
exit /b 1

:no_venv
echo ERROR: %PY_SHOW% could not create a virtual environment (messages above).
if exist ".venv" rmdir /s /q ".venv"
echo Repair or reinstall Python 3.12 from https://www.python.org/downloads/windows/ and double-click start.bat again.
pause
exit /b 1
